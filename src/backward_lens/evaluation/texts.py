"""A fixed, offline text set for the perplexity metric.

The paper measures perplexity on the first 100 rows of WikiText-2's test split; WikiText cannot be
downloaded here. These 48 sentences were written for this package (Apache-2.0, like the rest of
it) in the register of encyclopaedia prose: geography, history, science, arts, sport and everyday
facts, with names, dates and numbers, so that damage to general knowledge and fluency shows up as
a rise in perplexity. They are deliberately not CounterFact facts. Values are therefore not
comparable in absolute terms with the paper's WikiText perplexities, only across methods.
"""

from __future__ import annotations

PERPLEXITY_TEXTS: tuple[str, ...] = (
    "The river rises in the northern hills and flows south for about two hundred kilometres "
    "before it reaches the sea near a small fishing town.",
    "In the winter months the lake freezes over, and people from the nearby villages walk across "
    "the ice to visit their neighbours.",
    "The cathedral was built over more than a century, so its western towers are in a later style "
    "than the nave and the choir.",
    "Most of the island's population lives along the coast, where the climate is mild and the soil "
    "is good for growing olives and grapes.",
    "The mountain range forms a natural border between the two countries and was crossed by "
    "traders long before any road was built.",
    "After the war the city was rebuilt according to a new plan, with wide avenues, public parks "
    "and a large central square.",
    "The first railway line in the region opened in 1848 and connected the capital with the main "
    "port on the southern coast.",
    "During the nineteenth century many families left the countryside to find work in the "
    "factories of the growing industrial towns.",
    "The treaty ended three years of fighting and fixed the border along the river, where it has "
    "remained ever since.",
    "The old town hall now houses a museum that tells the history of the city from its founding "
    "to the present day.",
    "She was elected to parliament at the age of thirty and later served as minister of education "
    "for almost ten years.",
    "The empire reached its greatest extent in the second century, when it controlled most of the "
    "lands around the Mediterranean Sea.",
    "Water boils at a lower temperature at high altitude because the air pressure there is lower "
    "than at sea level.",
    "The human heart pumps blood through a network of arteries and veins that, laid end to end, "
    "would stretch for thousands of kilometres.",
    "Plants use the energy of sunlight to turn water and carbon dioxide into sugar, releasing "
    "oxygen into the air as they do so.",
    "The telescope allowed astronomers to see that the planet is surrounded by thin rings made of "
    "ice and small pieces of rock.",
    "Copper is a good conductor of electricity, which is why it is widely used in cables and "
    "electrical wiring.",
    "The vaccine was tested on thousands of volunteers before it was approved for general use by "
    "the health authorities.",
    "Earthquakes are common in the region because it lies where two large plates of the earth's "
    "crust meet and slowly grind past each other.",
    "The bird spends the summer in northern Europe and flies south to Africa every autumn, "
    "covering more than five thousand kilometres.",
    "A year on the planet lasts almost twelve times as long as a year on Earth, because it is much "
    "farther from the Sun.",
    "The novel follows a young teacher who moves to a remote village and slowly wins the trust of "
    "its suspicious inhabitants.",
    "His early paintings show quiet scenes of daily life, while his later work became darker and "
    "more abstract.",
    "The orchestra gave its first concert in 1882 and soon became one of the most respected "
    "ensembles in the country.",
    "The film was shot on location in the desert and won several awards for its photography and "
    "its music.",
    "The poet wrote most of her best known poems during the two years she spent living by the sea.",
    "The opera was poorly received at its premiere, but it is now one of the most frequently "
    "performed works of its composer.",
    "The library holds more than two million books, including a large collection of medieval "
    "manuscripts and early printed maps.",
    "The team won the national championship three times in a row and reached the final of the "
    "European cup in 1994.",
    "The marathon follows a route through the old city and finishes in front of the stadium built "
    "for the Olympic Games.",
    "He started playing chess at the age of five and became the youngest grandmaster in the "
    "history of his country.",
    "The match was interrupted by heavy rain in the second half and had to be finished on the "
    "following day.",
    "The company was founded in a small garage in 1976 and grew into one of the largest makers of "
    "computers in the world.",
    "Prices rose sharply after the harvest failed, and the government was forced to import grain "
    "from abroad.",
    "The bridge is more than a kilometre long and carries both cars and trains across the mouth of "
    "the river.",
    "Many of the workers in the town are employed at the steel plant, which has been the main "
    "source of jobs for decades.",
    "The new airport, opened in 2008, replaced an older one that had become too small for the "
    "growing number of passengers.",
    "Bread is made from flour, water, salt and yeast, which produces the gas that makes the dough "
    "rise.",
    "The market is held every Saturday morning in the main square, where farmers sell vegetables, "
    "cheese and fresh fish.",
    "Children in the country start school at the age of six and usually finish their secondary "
    "education at eighteen.",
    "Tea was first grown in the hills of the region in the nineteenth century and is still one of "
    "its main exports.",
    "The language is spoken by about ten million people, most of whom live in the central and "
    "eastern parts of the country.",
    "The castle stands on a rock above the valley and was for centuries the seat of the counts who "
    "ruled the surrounding land.",
    "The university was founded in the fourteenth century and is one of the oldest in Europe still "
    "in operation.",
    "The park is home to several rare species, including a small wild cat that is found nowhere "
    "else in the world.",
    "The festival takes place every summer and attracts musicians and visitors from many different "
    "countries.",
    "The ship sank during a storm in 1912, and its wreck was only discovered by divers more than "
    "seventy years later.",
    "The museum's collection of ancient coins is among the largest in the world and is visited by "
    "scholars from many countries.",
)
